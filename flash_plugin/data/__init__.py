"""Dataset loaders: Fashion-MNIST (IDX files) and image folders."""

from flash_plugin.data.fashion_mnist import FashionMNISTNotFound, find_fashion_mnist, load_fashion_mnist

__all__ = ["FashionMNISTNotFound", "find_fashion_mnist", "load_fashion_mnist"]
