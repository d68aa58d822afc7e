"""One package per patch: ``<id>/__init__.py`` declares ``PATCH`` (read at start-up, tiny) and
``<id>/impl.py`` implements it (imported when the target is). See hfpatches/_declare.py and
CONTRIBUTING.md; discovered by ``hfpatches._registry.registry``."""
