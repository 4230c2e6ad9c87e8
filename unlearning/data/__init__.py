"""Datasets (Fashion-MNIST, digits), the sample store and the demo catalogue."""
