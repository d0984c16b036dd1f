# Installed as tailbridge.models (pyproject maps this folder); imported under any other name
# (e.g. `import models` from the repository root) it would load every module twice.
if __name__ != "tailbridge.models":
    raise ImportError(f"import this package as tailbridge.models, not {__name__}")
