# Installed as tailbridge.infra (pyproject maps this folder); imported under any other name
# (e.g. `import infra` from the repository root) it would load every module twice.
if __name__ != "tailbridge.infra":
    raise ImportError(f"import this package as tailbridge.infra, not {__name__}")
