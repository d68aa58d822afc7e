"""One module per patch; each exports ``PATCH``. Discovered by ``hfpatches._registry.registry``.

Patch modules import only the standard library and hfpatches at import time: everything heavy
is imported inside ``probe`` / ``apply``, which run only once their target is imported.
"""
