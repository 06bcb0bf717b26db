"""The Coalition broker: gRPC servicers, routing core, store backends, audit."""
