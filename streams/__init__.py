# Installed as tailbridge.streams (pyproject maps this folder); imported under any other name
# (e.g. `import streams` from the repository root) it would load every module twice.
if __name__ != "tailbridge.streams":
    raise ImportError(f"import this package as tailbridge.streams, not {__name__}")
