"""``fuseserve experiment``: the paper's comparisons (Tables 4, 5, 7, 11 and Figure 2), small."""
