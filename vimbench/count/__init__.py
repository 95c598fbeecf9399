"""What can be counted or predicted without running on the device: FLOPs (meta tensors), GPU memory
(fake CUDA tensors and a model of the caching allocator), and the Triton kernels' compiled resources."""
