"""distributed-ebm."""
