"""Deployable outputs: the compressed sparse (+ INT8) checkpoint and GGUF for llama.cpp-style runtimes."""
