"""Tests of aio."""
