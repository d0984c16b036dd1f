# Installed as tailbridge.bench (pyproject maps this folder); imported under any other name
# (e.g. `import bench` from the repository root) it would load every module twice.
if __name__ != "tailbridge.bench":
    raise ImportError(f"import this package as tailbridge.bench, not {__name__}")
