"""Checkpoint evaluation: metric networks (feature_network, networks, real_networks), metrics,
sampling, the evaluator, its policies (strengths, screening, distilled transfer) and the collapse
rules (pure functions over typed rows). Heavy libraries load in the modules that use them."""
