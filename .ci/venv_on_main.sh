# Sourced by the .ci steps. `venv_on_main DIR` makes a virtual environment that sees the main
# environment's packages (those of `python` on PATH: the venv .ci/run made, or whatever environment
# a step is run from by hand) and installs its own on top of them. `python -m venv
# --system-site-packages` would see the base interpreter's packages instead, which on a fresh
# machine, with the main environment in a venv, are none.
venv_on_main() {
  local venv="$1" site main
  rm -rf "$venv"
  python -m venv "$venv"
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  main="$(python -c 'import site; print(site.getsitepackages())')"
  # addsitedir (not a plain path line) also runs the main environment's own .pth files (editable installs).
  echo "import site; list(map(site.addsitedir, $main))" >"$site/prunevid_main_env.pth"
}
