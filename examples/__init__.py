"""Shipped example pairs (package data, installed as ``gmner.examples``): ``demo/`` holds the
images and ``examples.jsonl`` that ``gmner demo`` runs the embedded default model on."""
