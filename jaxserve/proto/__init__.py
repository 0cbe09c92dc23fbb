"""Generated gRPC/protobuf code for the wire contract in `proto/jaxserve/v1/` (regenerate with
`python -m jaxserve.proto.generate`). Import the modules from `jaxserve.proto.v1`:
`common_pb2`, `scheduler_pb2`, `scheduler_pb2_grpc`, `instance_pb2`, `instance_pb2_grpc`."""
