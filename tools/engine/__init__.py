"""The engine stage (``make engine``): load a RetinaFace ONNX, rewrite it with
onnx-graphsurgeon, check it for TensorRT, validate it with Polygraphy against the original graph
plus a reference decode, build the detector artifact and write the Triton model repository."""
