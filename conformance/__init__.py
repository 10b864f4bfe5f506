"""Conformance suite: golden vectors from ref/ and a runner that checks any implementation."""
