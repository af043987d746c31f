"""How a network runs on a device: precision, the lean eager pass, compiled, Triton."""
