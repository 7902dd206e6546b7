"""Tests of rendezvous."""
