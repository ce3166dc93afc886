"""Backends of spinal_ops. Each is a peer implementing ``backends.base.Backend``;
``spinal_ops.dispatch`` lists them and picks one per call."""
