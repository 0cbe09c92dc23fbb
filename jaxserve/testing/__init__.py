"""Test and benchmark stand-ins (never imported by production code): `fake_instance.FakeInstance`, the
Instance gRPC service and registration protocol without an engine."""
