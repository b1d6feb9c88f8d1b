# Builder of nixpush's benchmark data, run by Nix as `/bin/sh gen.sh` (see closure.nix).
# POSIX sh + coreutils/findutils/tar/awk; offline; no nixpkgs.
#
# Environment (derivation attributes):
#   kind   text | elf | random | smallfiles | mixed | big | root
#   size   approximate content size in bytes
#   seed   makes the content of this path (data is deterministic for a given machine)
#   deps   store paths this one refers to (become its references)
set -eu
umask 022

mkdir -p "$out/nix-support"
if [ -n "${deps:-}" ]; then
  for d in $deps; do echo "$d"; done > "$out/nix-support/deps"
  # A symlink into a dependency, as packages have (lib -> other package).
  set -- $deps
  ln -s "$1" "$out/nix-support/first-dep"
fi

# A number derived from the seed, to pick where to start in the file pools.
off=$(printf '%s' "$seed" | cksum | cut -d' ' -f1)

# rand BYTES FILE TAG: incompressible bytes from a seeded generator (AES-128-CTR keystream).
rand() {
  rk=$(printf '%s/%s' "$seed" "$3" | sha256sum | cut -c1-32)
  if command -v openssl >/dev/null 2>&1; then
    head -c "$1" /dev/zero |
      openssl enc -aes-128-ctr -nosalt -K "$rk" -iv 00000000000000000000000000000000 > "$2"
  else
    head -c "$1" /dev/urandom > "$2"   # not reproducible, but just as incompressible
  fi
}

# Pools of real files on this machine, "SIZE PATH" lines in a stable order.
pool_text() {
  find /usr/include /usr/share/perl5 /usr/share/perl /usr/lib/python3 /usr/lib/python3.* \
    /usr/share/doc /usr/share/misc -type f \
    \( -name '*.h' -o -name '*.py' -o -name '*.pm' -o -name '*.pl' -o -name '*.txt' \
       -o -name 'copyright' -o -name '*.md' -o -name '*.rst' -o -name '*.html' \) \
    ! -name '* *' -size -1024k -printf '%s %p\n' 2>/dev/null | LC_ALL=C sort -k2
}
pool_elf() {
  find /usr/bin /usr/sbin /usr/lib /usr/libexec -maxdepth 2 -type f \
    \( -name '*.so' -o -name '*.so.*' -o -perm -u+x \) \
    ! -perm -4000 ! -perm -2000 ! -name '* *' -size +4k -size -65536k -printf '%s %p\n' 2>/dev/null | LC_ALL=C sort -k2
}

# window BYTES < pool: relative paths from a seed-chosen start, wrapping, until BYTES are covered.
window() {
  awk -v want="$1" -v start="$off" '
    { s[NR] = $1; p[NR] = substr($0, index($0, " ") + 2) }
    END {
      if (NR == 0) exit 0
      i = start % NR; tot = 0; n = 0
      while (tot < want && n < NR) {
        # Skip files that would overshoot by much, so small paths stay small.
        if (tot + s[i + 1] <= want * 1.25 + 65536) { print p[i + 1]; tot += s[i + 1] }
        i = (i + 1) % NR; n++
      }
    }'
}

# copy_pool POOLFN BYTES DEST: real files (with their directory structure) into DEST.
copy_pool() {
  mkdir -p "$3"
  $1 | window "$2" | tar -C / -cf - -T - 2>/dev/null | tar -C "$3" --no-same-owner --no-same-permissions -xf -
}

# smallfiles BYTES DIR: many small generated source-like files (64 B - 8 KiB, skewed small)
# in nested directories, plus a few symlinks.
smallfiles() {
  mkdir -p "$2"
  awk -v want="$1" -v dir="$2" -v seed="$off" 'BEGIN {
    srand(seed % 2147483647)
    nw = split("static const int return void struct if else for while unsigned char size_t " \
      "buffer length index value result error module package import def class self None " \
      "true false let mut fn pub use impl match Some Ok Err self.data assert { } ( ) ; = == " \
      "+ - * / # include define TODO FIXME the a of to and is in that for it with as", w, " ")
    split("c h py rs", ext, " ")
    tot = 0; i = 0
    while (tot < want) {
      d = sprintf("%s/m%02d/s%02d", dir, i % 23, (i * 7) % 13)
      if (!(d in made)) { system("mkdir -p " d); made[d] = 1 }
      f = sprintf("%s/f%05d.%s", d, i, ext[i % 4 + 1])
      n = int(64 + rand() ^ 3 * 8000); s = 0
      while (s < n) {
        line = ""; k = int(rand() * 12) + 1
        for (j = 0; j < k; j++) line = line w[int(rand() * nw) + 1] " "
        line = line int(rand() * 100000)
        print line > f; s += length(line) + 1
      }
      close(f); tot += s; i++
      if (i % 97 == 0) system("ln -s " f " " f ".link")
    }
  }'
}

case "$kind" in
  root) ;;
  text) copy_pool pool_text "$size" "$out/share" ;;
  elf)
    copy_pool pool_elf "$size" "$out"
    ;;
  random)
    mkdir -p "$out/data"
    if [ "$size" -gt 4194304 ]; then
      half=$((size / 2))
      rand "$half" "$out/data/blob-a.bin" a
      rand "$((size - half))" "$out/data/blob-b.bin" b
    else
      rand "$size" "$out/data/blob.bin" a
    fi
    ;;
  smallfiles) smallfiles "$size" "$out/src" ;;
  mixed)
    # Like a typical package: binaries and libraries, docs, a data file, a source tree.
    copy_pool pool_elf "$((size * 3 / 10))" "$out"
    copy_pool pool_text "$((size * 3 / 10))" "$out/share"
    mkdir -p "$out/share/data"
    rand "$((size / 5 + 1))" "$out/share/data/table.bin" mixed
    smallfiles "$((size / 5))" "$out/src"
    ;;
  big)
    # A few-GiB path of large files: 3 of 4 chunks incompressible, the 4th concatenated
    # real binaries and libraries (compressible ~2-3x).
    mkdir -p "$out/data"
    chunk=$((size / 16))
    [ "$chunk" -gt 268435456 ] && chunk=268435456
    [ "$chunk" -lt 1048576 ] && chunk=1048576
    left=$size; k=0
    while [ "$left" -gt 0 ]; do
      c=$chunk; [ "$c" -gt "$left" ] && c=$left
      f=$(printf '%s/data/chunk-%03d.bin' "$out" "$k")
      if [ $((k % 4)) -eq 3 ]; then
        off=$((off + k))
        pool_elf | window "$c" | sed 's|^|/|' | xargs cat | head -c "$c" > "$f"
      else
        rand "$c" "$f" "chunk$k"
      fi
      left=$((left - c)); k=$((k + 1))
    done
    ;;
  *) echo "gen.sh: unknown kind '$kind'" >&2; exit 1 ;;
esac
