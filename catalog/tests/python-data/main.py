import io
import sys

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import scipy.optimize

# pandas reads the input as CSV, numpy doubles it, scipy finds the same number again.
frame = pd.read_csv(sys.stdin, header=None)
n = int(np.array(frame[0])[0] * 2)
root = scipy.optimize.brentq(lambda x: x - n, 0, 1000)
assert round(root) == n
# matplotlib draws it (the Agg backend: a PNG in memory).
fig, ax = plt.subplots()
ax.bar(["n"], [n])
png = io.BytesIO()
fig.savefig(png, format="png")
assert png.getvalue().startswith(b"\x89PNG")
print(n)
for a in sys.argv[1:]:
    print(a)
print("conformance-stderr", file=sys.stderr)
sys.exit(3)
