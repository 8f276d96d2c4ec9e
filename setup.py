"""Maps the top-level folders onto the ``fedblocks`` namespace.

export/ -> fedblocks.export, device_runtime/ -> fedblocks.device_runtime,
testbed/ -> fedblocks.testbed, host/ -> fedblocks.host. Works for regular and
editable (PEP 660) installs.
"""

from setuptools import find_packages, setup

ROOTS = ("export", "device_runtime", "testbed", "host")

packages: list[str] = []
package_dir: dict[str, str] = {}
for root in ROOTS:
    packages.append(f"fedblocks.{root}")
    package_dir[f"fedblocks.{root}"] = root
    for sub in find_packages(root):
        packages.append(f"fedblocks.{root}.{sub}")
        package_dir[f"fedblocks.{root}.{sub}"] = f"{root}/{sub.replace('.', '/')}"

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={pkg: ["*.toml", "*.json", "*.html", "*.css", "*.js"] for pkg in packages},
    include_package_data=True,
)
