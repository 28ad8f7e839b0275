# Sourced by the wrappers that move to the repository root before running Python: the paths a user
# gives are relative to where they called from, so they are made absolute first.

# abspath PATH: PATH against the caller's directory (no realpath: older macOS lacks it).
abspath() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s' "$PWD/$1" ;; esac; }

# absolute_options "OPT ..." ARG...: sets ARGS to ARG... with the value of each listed option made
# absolute, whether given as "--opt VALUE" or "--opt=VALUE".
absolute_options() {
  local opts=" $1 "
  shift
  ARGS=()
  while [ $# -gt 0 ]; do
    if [[ $opts == *" $1 "* ]] && [ $# -ge 2 ]; then
      ARGS+=("$1" "$(abspath "$2")"); shift 2; continue
    fi
    if [[ $1 == --*=* && $opts == *" ${1%%=*} "* ]]; then ARGS+=("${1%%=*}=$(abspath "${1#*=}")"); else ARGS+=("$1"); fi
    shift
  done
}
