"""``python -m bang_jax.data download mnist|fashion_mnist|cifar10 [--dir DIR]``: the download command
(:mod:`bang_jax.download`), under the name the docs use. A separate module, so that loading data never imports the
downloader and the two modules do not import each other."""

from bang_jax.download import main

raise SystemExit(main())
