"""Offline stand-in for the get-pip bootstrap script ansible-test downloads for its sanity-test venvs.

ansible-test runs this script (from ~/.ansible/test/cache/get_pip_<version>.py) inside a fresh venv with the pip
options it wants, e.g. ``pip==24.2 --no-setuptools --no-wheel``. Without network access to its download site we
bootstrap pip from the interpreter's own ensurepip, then install the requested versions from the package index
pip is configured with (pip.conf, PIP_INDEX_URL). `make lint` puts this file in ansible-test's cache.
"""
import subprocess
import sys

BOOTSTRAP_ONLY_OPTIONS = ("--no-setuptools", "--no-wheel")


def main():
    requested = [arg for arg in sys.argv[1:] if arg not in BOOTSTRAP_ONLY_OPTIONS]
    subprocess.check_call([sys.executable, "-m", "ensurepip", "--default-pip"], stdout=subprocess.DEVNULL)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet"] + requested)


if __name__ == "__main__":
    main()
