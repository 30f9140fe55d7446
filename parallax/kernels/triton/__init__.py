"""The Triton kernels (training forward and backward, single-token decode),
their custom ops and the resource model that prunes their tilings. Nothing
here is imported until a Triton path runs: importing parallax needs no triton."""
