"""Generated from proto/jaxserve/v1 by `python -m jaxserve.proto.generate`; do not edit."""
