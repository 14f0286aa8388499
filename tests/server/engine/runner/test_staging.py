from __future__ import annotations

import numpy as np
import torch

from mcserve.server.engine.runner.staging import Staging


def test_pieces_of_mixed_widths_come_back_as_put_and_appliers_run_in_order() -> None:
    st = Staging(torch.device("cpu"), words=4)  # grows
    seen = []
    for step in range(3):
        a = st.put([1, 2, 3], np.int32)
        b = st.put([[1.5, -2.0], [step, 1e300]], np.float64)  # aligned after 3 words
        c = st.put(np.arange(5, dtype=np.float32) / 3)
        d = st.put([-(2**40), 2**62 + step], np.int64)
        st.then(lambda a=a, b=b: seen.append(("first", a.get().tolist(), b.get().tolist())))
        st.then(lambda c=c, d=d: seen.append(("second", c.get().tolist(), d.get().tolist())))
        assert not seen[2 * step:]
        st.send()
        assert b.offset % 2 == 0 and d.offset % 2 == 0
        assert seen[2 * step] == ("first", [1, 2, 3], [[1.5, -2.0], [float(step), 1e300]])
        assert seen[2 * step + 1] == ("second", (np.arange(5, dtype=np.float32) / 3).tolist(),
                                      [-(2**40), 2**62 + step])
    st.send()  # nothing new: no-op
    assert len(seen) == 6
