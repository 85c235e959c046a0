"""Readers and writers of files other tools share: node-link graphs, buffer CSVs."""
