#!/usr/bin/env bash
# Download current City and ASN GeoIP databases for the gateway, verify them, and move them into
# place atomically. Operator tool: it needs the internet, so the test suite never runs it.
#
# Sources:
#   maxmind  GeoLite2-City + GeoLite2-ASN from MaxMind (free account and licence key needed;
#            data licensed CC BY-SA 4.0). Installs GeoLite2-City.mmdb and GeoLite2-ASN.mmdb.
#   dbip     DB-IP Lite City + ASN (no account; data licensed CC BY 4.0, attribution
#            "IP Geolocation by DB-IP"). Installs dbip-city-lite.mmdb and dbip-asn-lite.mmdb.
#
# Then point the gateway at them (config YAML) and reload it (SIGHUP) or restart it:
#   geoip:
#     city_db: /var/lib/mirror-gateway/GeoLite2-City.mmdb
#     asn_db: /var/lib/mirror-gateway/GeoLite2-ASN.mmdb
#
# Run it from cron weekly (MaxMind publishes twice a week, DB-IP monthly). See geodata/README.md.
set -euo pipefail

usage() {
  cat <<EOF
Usage: $(basename "$0") maxmind|dbip [TARGET_DIR]

Download a current City and ASN mmdb into TARGET_DIR (default: /var/lib/mirror-gateway),
check that each opens with maxminddb and is of the expected type, then rename both into place
(an interrupted or failed run leaves the installed files untouched).

  maxmind   GeoLite2-City.mmdb and GeoLite2-ASN.mmdb from MaxMind.
            Needs MAXMIND_LICENSE_KEY (a free GeoLite2 account's licence key).
  dbip      dbip-city-lite.mmdb and dbip-asn-lite.mmdb from DB-IP's free monthly Lite builds.

Environment:
  MAXMIND_LICENSE_KEY  licence key for 'maxmind' (never printed)
  PYTHON               Python with the maxminddb package, for verification (default: python3)

Afterwards set geoip.city_db / geoip.asn_db to the installed files and send the gateway SIGHUP.
EOF
}

log() { printf '%s\n' "update_geoip: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

[ $# -ge 1 ] && [ $# -le 2 ] || {
  usage >&2
  exit 2
}
case "$1" in
  -h | --help)
    usage
    exit 0
    ;;
  maxmind | dbip) source=$1 ;;
  *)
    usage >&2
    exit 2
    ;;
esac
target=${2:-/var/lib/mirror-gateway}
python=${PYTHON:-python3}
if [ "$source" = maxmind ] && [ -z "${MAXMIND_LICENSE_KEY:-}" ]; then
  die "set MAXMIND_LICENSE_KEY (see https://www.maxmind.com/en/geolite2/signup)"
fi

command -v curl >/dev/null || die "curl is required"
command -v "$python" >/dev/null || die "$python not found (set PYTHON)"
"$python" -c 'import maxminddb' 2>/dev/null || die "$python cannot import maxminddb (set PYTHON)"
mkdir -p "$target"

# Work inside the target directory so the final rename stays on one filesystem (atomic).
work=$(mktemp -d "$target/.geoip-update.XXXXXX")
trap 'rm -rf "$work"' EXIT

fetch() { # URL OUTPUT: quiet, fails on HTTP errors, never echoes the URL (it may hold a key)
  curl --fail --silent --show-error --location --retry 3 --connect-timeout 20 --max-time 900 \
    --output "$2" "$1"
}

# Open the file with maxminddb, print its metadata, and insist its type mentions $2.
verify() { # FILE EXPECTED_TYPE_SUBSTRING
  "$python" -c 'import sys, datetime, maxminddb; m = maxminddb.open_database(sys.argv[1]).metadata(); print(f"{sys.argv[1]}: {m.database_type}, built {datetime.datetime.fromtimestamp(m.build_epoch, datetime.timezone.utc):%Y-%m-%d}, IPv{m.ip_version}, {m.node_count} nodes, languages {m.languages}"); sys.exit(0 if sys.argv[2] in m.database_type else f"{sys.argv[1]}: database type {m.database_type!r} does not contain {sys.argv[2]!r}")' "$1" "$2"
}

download_maxmind() { # EDITION -> $work/EDITION.mmdb
  local edition=$1
  local url="https://download.maxmind.com/app/geoip_download?edition_id=${edition}&license_key=${MAXMIND_LICENSE_KEY}"
  log "downloading $edition from MaxMind"
  fetch "${url}&suffix=tar.gz" "$work/$edition.tar.gz" || die "download of $edition failed (check MAXMIND_LICENSE_KEY)"
  fetch "${url}&suffix=tar.gz.sha256" "$work/$edition.tar.gz.sha256" || die "download of the $edition checksum failed"
  local want have
  want=$(cut -d' ' -f1 <"$work/$edition.tar.gz.sha256")
  have=$("$python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$work/$edition.tar.gz")
  [ "$want" = "$have" ] || die "$edition: SHA-256 mismatch (expected $want, got $have)"
  # The archive holds EDITION_YYYYMMDD/EDITION.mmdb (plus licence files).
  mkdir "$work/$edition.x"
  tar -xzf "$work/$edition.tar.gz" -C "$work/$edition.x"
  local found
  found=$(find "$work/$edition.x" -type f -name "$edition.mmdb" | head -n 1)
  [ -n "$found" ] || die "$edition: no $edition.mmdb in the archive"
  mv "$found" "$work/$edition.mmdb"
}

download_dbip() { # KIND (city|asn) -> $work/dbip-KIND-lite.mmdb
  local kind=$1 month file
  # The month's file appears early in the month; until it does, take last month's.
  for month in $("$python" -c 'import datetime as d; t = d.date.today(); p = t.replace(day=1) - d.timedelta(days=1); print(t.strftime("%Y-%m"), p.strftime("%Y-%m"))'); do
    file="dbip-${kind}-lite-${month}.mmdb.gz"
    log "downloading $file from DB-IP"
    if fetch "https://download.db-ip.com/free/$file" "$work/$file"; then
      gzip -dc "$work/$file" >"$work/dbip-${kind}-lite.mmdb" || die "$file: not a valid gzip file"
      return 0
    fi
    log "$file is not available"
  done
  die "no DB-IP $kind Lite database for this or last month"
}

case "$source" in
  maxmind)
    download_maxmind GeoLite2-City
    download_maxmind GeoLite2-ASN
    files=(GeoLite2-City.mmdb GeoLite2-ASN.mmdb)
    types=(City ASN)
    ;;
  dbip)
    download_dbip city
    download_dbip asn
    files=(dbip-city-lite.mmdb dbip-asn-lite.mmdb)
    types=(City ASN)
    ;;
esac

# Verify everything before installing anything, so City and ASN are updated together.
for i in "${!files[@]}"; do
  verify "$work/${files[$i]}" "${types[$i]}" || die "${files[$i]} failed verification; nothing installed"
done
for file in "${files[@]}"; do
  chmod 0644 "$work/$file"
  mv -f "$work/$file" "$target/$file" # rename(2) within one directory: atomic
  log "installed $target/$file"
done
log "done; set geoip.city_db and geoip.asn_db to the files above and send the gateway SIGHUP"
