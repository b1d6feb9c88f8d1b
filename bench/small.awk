# Writes the outputs of one layer of the small-paths set (see small.nix); run by mawk or gawk.
#   -v seed=N     a number from the salt (cksum)
#   -v layer=K    this layer; K > 0 reads layer K-1's output paths from $prevPath, one a line
#   -v width=W    outputs o0 … o{W-1}, their paths in $o0 …, directories made already
# A Lehmer generator (48271 mod 2^31-1; products stay below 2^53, exact in awk's doubles) makes
# the same choices in every awk.
function rnd() { state = (state * 48271) % 2147483647; return state }
BEGIN {
  state = (seed + 7919 * (layer + 1)) % 2147483647
  if (state == 0) state = 1
  for (i = 0; i < 8; i++) rnd()
  n = 0
  if (layer > 0)
    while ((getline line < ENVIRON["prevPath"]) > 0)
      if (line != "") prev[n++] = line
  if (layer > 0 && n != width) { print "small.awk: expected " width " paths, got " n > "/dev/stderr"; exit 1 }
  for (j = 0; j < width; j++) {
    f = ENVIRON["o" j] "/data"
    head = sprintf("np-bench small path: layer %d, output %d, salt %s\n", layer, j, ENVIRON["salt"])
    if (layer > 0) {
      # Three distinct references: the same index (every output of layer K-1 is referred to)
      # and two more.
      a = j
      do b = rnd() % n; while (b == a)
      do c = rnd() % n; while (c == a || c == b)
      head = head "refers to " prev[a] "\nrefers to " prev[b] "\nrefers to " prev[c] "\n"
    }
    printf "%s", head > f
    size = 256 + rnd() % 3841
    done = length(head)
    while (done < size) {
      s = sprintf("%08x %d %d\n", rnd(), j, rnd() % 100000)
      printf "%s", s > f
      done += length(s)
    }
    close(f)
  }
}
