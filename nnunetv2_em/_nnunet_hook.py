"""Interpreter-start hook that lets nnU-Net's stock CLIs find this plugin's classes.

Loaded by ``nnunetv2_em_hook.pth`` in every interpreter of the environment (nnU-Net's ``spawn`` workers
included). At start-up it only appends a finder to ``sys.meta_path``; nothing is imported. Two modules get a
callback right after they have executed:

* ``nnunetv2.utilities.find_class_by_name``: ``recursive_find_python_class`` is wrapped so that a class that
  nnU-Net does not know (it would return ``None`` and fail) is looked up in this plugin's matching subpackage
  (trainers for the trainer tree, planners for ``experiment_planning``). Classes nnU-Net finds itself are
  returned unchanged, so vanilla behaviour is untouched. The wrap happens before any nnU-Net module binds the
  function with ``from ... import``.
* ``torchvision.extension``: on a CPU-only torch with the registry's CUDA build of torchvision, the extension
  library fails to load and ``import torchvision`` then dies on ``register_fake("torchvision::nms")``, which
  breaks nnU-Net's trainer lookup (Primus -> timm -> torchvision). When torchvision reports no compiled ops we
  define the two op schemas it registers fakes for, so the import succeeds. Where the extension loads (a GPU
  machine) this does nothing.
"""

import importlib.abc
import importlib.machinery
import os
import sys
import threading

_FINDER_MODULE = "nnunetv2.utilities.find_class_by_name"
_TORCHVISION_EXTENSION = "torchvision.extension"

# nnU-Net search roots (relative to the nnunetv2 package) -> our subpackage holding classes of that kind
PLUGIN_PACKAGES_BY_SEARCH_ROOT = {
    os.path.join("training", "nnUNetTrainer"): "nnunetv2_em.trainers",
    "experiment_planning": "nnunetv2_em.planners",
}

_lookup_guard = threading.local()


def _plugin_package_for(folder: str):
    """Our subpackage for an nnU-Net search root, or None when the search is not one we extend."""
    import nnunetv2

    nnunet_root = os.path.abspath(nnunetv2.__path__[0])
    folder = os.path.abspath(folder)
    for relative_root, package in PLUGIN_PACKAGES_BY_SEARCH_ROOT.items():
        if folder == os.path.join(nnunet_root, relative_root):
            return package
    return None


def _find_in_plugin(original_finder, folder: str, class_name: str):
    package_name = _plugin_package_for(folder)
    if package_name is None:
        return None
    package_folder = __import__(package_name, fromlist=["__path__"]).__path__[0]
    # the folder above the top-level package is already on sys.path, so nnU-Net's finder adds nothing to it
    importable_root = os.path.dirname(os.path.dirname(package_folder))
    return original_finder(package_folder, class_name, package_name, importable_root)


def _wrap_class_finder(module) -> None:
    original = module.recursive_find_python_class

    def recursive_find_python_class(folder, class_name, current_module, *args, **kwargs):
        found = original(folder, class_name, current_module, *args, **kwargs)
        if found is not None or getattr(_lookup_guard, "active", False):
            return found
        _lookup_guard.active = True
        try:
            return _find_in_plugin(original, folder, class_name)
        finally:
            _lookup_guard.active = False

    recursive_find_python_class.__wrapped__ = original
    recursive_find_python_class.__doc__ = original.__doc__
    module.recursive_find_python_class = recursive_find_python_class


def _define_missing_torchvision_ops(extension_module) -> None:
    if extension_module._has_ops():
        return
    import torch

    if hasattr(torch.ops.torchvision, "nms"):
        return
    library = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # the Library object must outlive this call or the definitions are dropped again
    extension_module._nnunetv2_em_cpu_op_schemas = library


_CALLBACKS = {
    _FINDER_MODULE: _wrap_class_finder,
    _TORCHVISION_EXTENSION: _define_missing_torchvision_ops,
}


class _PostImportLoader(importlib.abc.Loader):
    def __init__(self, loader, callback):
        self._loader = loader
        self._callback = callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            self._callback(module)
        except Exception as error:  # never break nnU-Net or torchvision because of the plugin
            print(f"nnunetv2_em: start-up hook for {module.__name__} failed: {error!r}", file=sys.stderr)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        callback = _CALLBACKS.get(fullname)
        if callback is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PostImportLoader(spec.loader, callback)
        return spec


def install() -> None:
    if not any(isinstance(finder, _PostImportFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PostImportFinder())


if os.environ.get("NNUNETV2_EM_DISABLE_HOOK", "") not in ("1", "true", "True"):
    install()
