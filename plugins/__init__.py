"""Built-in plugins. Installed as ``lmforge_plugins``; registered through the ``lmforge`` entry-point group like any third-party package, so this folder is the reference for plugin authors."""
