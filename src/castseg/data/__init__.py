"""Data layer: convert → split → dataset. Everything in COCO instances format."""
