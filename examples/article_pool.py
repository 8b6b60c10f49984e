"""The article's ``Pool.map`` program, unchanged apart from the import.

The article (multiprocessing, then called ``processing``) built a word list in
the parent, cut it into chunks and let a pool of four workers search each
chunk for palindromes.  This is that program; the only change is the line
``from procession import Pool`` (was ``from processing import Pool``).  What
that line buys: a worker that dies fails its chunk instead of hanging ``map``,
and no ``if __name__ == "__main__"`` guard is needed (it is kept here because
the article had it).  ``examples/pool_palindromes.py`` shows how to avoid
shipping the words at all.

Run: python examples/article_pool.py [--small]
"""

# ruff: noqa: UP031  (the article's %-formatting, kept as it was)

import random
import string
import sys
import time

from procession import Pool  # the article: from processing import Pool

N = 20_000 if "--small" in sys.argv else 1_000_000
CHUNK = 10_000


def random_word(length=5):
    return "".join(random.choice(string.ascii_lowercase) for _ in range(length))


def find_palindromes(words):
    found = []
    for word in words:
        half = len(word) // 2
        if word[:half] == word[::-1][:half]:
            found.append(word)
    return found


if __name__ == "__main__":
    random.seed(42)
    words = [random_word() for _ in range(N)]
    chunks = [words[i : i + CHUNK] for i in range(0, N, CHUNK)]

    start = time.time()
    serial = list(map(find_palindromes, chunks))
    print("sequential: %.3f s" % (time.time() - start))

    start = time.time()
    pool = Pool(4)
    results = pool.map(find_palindromes, chunks)
    pool.close()
    pool.join()
    print("Pool(4).map: %.3f s" % (time.time() - start))

    assert results == serial
    print("%d palindromes among %d words" % (sum(len(r) for r in results), N))
