# Installed as tailbridge.serving (pyproject maps this folder); imported under any other name
# (e.g. `import serving` from the repository root) it would load every module twice.
if __name__ != "tailbridge.serving":
    raise ImportError(f"import this package as tailbridge.serving, not {__name__}")
