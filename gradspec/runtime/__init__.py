"""What runs a compiled spec on real parameters: flat buckets, the closure driver, the Optimizer."""
