"""The built-in digits demo: a tiny LlamaGen C2I model trained on scikit-learn's bundled digits.

``data`` (images, augmentation, prompt -> class), ``classifier`` (the quality meter), ``checkpoint``
(loading/saving ``ckpts/demo``), ``sampling`` (a measurement-only KV-cached CFG sampler) and ``train``
(``python -m models.demo.train --out ckpts/demo`` reruns the whole recipe). Nothing is imported here, so
importing a submodule stays cheap.
"""
