"""Experiments on real data: readers, the small ResNet, training loops and the jobs."""
