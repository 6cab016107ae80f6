# Sourced by the report scripts: the repository root, the curvlab command, the shared data folder,
# and publish_report, which copies a report's files into figures/ and analyses/results/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
curvlab="${CURVLAB:-.venv/bin/curvlab}"
shared="${SHARED_DATA:-../shared/data}"
[[ -d "$shared" ]] || shared=/work/shared/data
mkdir -p figures analyses/results

publish_report() {  # publish_report <name> <figure>...: runs/report-<name> → the README's folders
    local name=$1
    shift
    cp "runs/report-$name/report.nc" "analyses/results/report_$name.nc"
    cp "runs/report-$name/summary.md" "analyses/results/report_$name.md"
    for fig in "$@"; do
        cp "runs/report-$name/$fig.png" "figures/report_${name}_$fig.png"
    done
}
