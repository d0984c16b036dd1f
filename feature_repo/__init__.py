# Installed as tailbridge.feature_repo (pyproject maps this folder); imported under any other name
# (e.g. `import feature_repo` from the repository root) it would load every module twice.
if __name__ != "tailbridge.feature_repo":
    raise ImportError(f"import this package as tailbridge.feature_repo, not {__name__}")
