#!/usr/bin/env bash
# Installs the Debian packages the offline data sets need (tfdml.data.builders):
# the small CJK / Hangul font sets (about 36 MB of .debs) and dataset-fashion-mnist
# (30 MB). `--full` adds every package of the full CJK set (about 450 MB).
# As root it runs apt-get; otherwise it prints the missing packages and exits 1.
# The lists must match tfdml/data/builders/fonts.py (tests/data/test_builders.py checks).
set -euo pipefail

SMALL_PACKAGES="fonts-sawarabi-gothic fonts-sawarabi-mincho fonts-motoya-l-cedar
fonts-motoya-l-maruberi fonts-aoyagi-kouzan-t fonts-smiley-sans fonts-mona fonts-komatuna
fonts-droid-fallback fonts-arphic-gbsn00lp fonts-arphic-gkai00mp fonts-dejima-mincho
fonts-vlgothic fonts-misaki fonts-baekmuk fonts-lexi-gulim fonts-lexi-saebom
dataset-fashion-mnist"

FULL_PACKAGES="fonts-noto-cjk fonts-arphic-ukai fonts-arphic-uming fonts-arphic-bkai00mp
fonts-arphic-bsmi00lp fonts-arphic-gbsn00lp fonts-arphic-gkai00mp fonts-wqy-zenhei
fonts-wqy-microhei fonts-droid-fallback fonts-ipafont-gothic fonts-ipafont-mincho
fonts-ipaexfont-gothic fonts-ipaexfont-mincho fonts-vlgothic fonts-sawarabi-gothic
fonts-sawarabi-mincho fonts-horai-umefont fonts-komatuna fonts-konatu fonts-mona
fonts-motoya-l-cedar fonts-motoya-l-maruberi fonts-seto fonts-yozvox-yozfont fonts-klee
fonts-morisawa-bizud-gothic fonts-morisawa-bizud-mincho fonts-kiloji fonts-aoyagi-kouzan-t
fonts-aoyagi-soseki fonts-kouzan-mouhitsu fonts-lxgw-wenkai fonts-cwtex-fs fonts-cwtex-heib
fonts-cwtex-kai fonts-cwtex-ming fonts-cwtex-yen fonts-babelstone-han fonts-smiley-sans
fonts-dejima-mincho fonts-oradano-mincho-gsrr fonts-mplus fonts-dotgothic16 fonts-misaki
fonts-yusei-magic fonts-unfonts-core fonts-baekmuk fonts-nanum fonts-nanum-extra
fonts-lexi-gulim fonts-lexi-saebom fonts-woowa-bm fonts-unfonts-extra"

PACKAGES="$SMALL_PACKAGES"
if [ "${1:-}" = "--full" ]; then
  PACKAGES="$SMALL_PACKAGES $FULL_PACKAGES"
elif [ "${1:-}" = "--list" ]; then
  echo $SMALL_PACKAGES
  exit 0
elif [ -n "${1:-}" ]; then
  echo "usage: $0 [--full|--list]" >&2
  exit 2
fi

missing=""
for p in $PACKAGES; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    case " $missing " in *" $p "*) ;; *) missing="$missing $p" ;; esac
  fi
done
if [ -z "$missing" ]; then
  echo "install_fonts.sh: all packages installed"
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends $missing
else
  echo "install_fonts.sh: missing packages (run as root to install):$missing" >&2
  echo "  sudo apt-get install -y --no-install-recommends$missing" >&2
  exit 1
fi
