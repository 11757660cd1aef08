// A scrolling per-sample plot on a canvas: each column holds the mean of `perColumn` consecutive
// samples of every series (k series), the newest column on the right; `shown` samples span the plot.
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const MARGIN = 48; // px left of the plot for the axis labels

export class Plot {
  /**
   * @param canvas the <canvas>
   * @param names one name per series (k)
   * @param opts {shown: samples across the plot, unit: y label, range: [lo, hi] or null (auto)}
   */
  constructor(canvas, names, { shown, unit = "", range = null }) {
    this.canvas = canvas;
    this.names = names;
    this.unit = unit;
    this.range = range;
    const width = Math.max(1, canvas.width - MARGIN);
    this.perColumn = Math.max(1, Math.round(shown / width));
    this.slots = Math.max(1, Math.min(width, Math.ceil(shown / this.perColumn))); // columns across the plot
    this.step = width / this.slots; // px per column
    this.columns = names.map(() => []); // per series, at most `width` column means
    this.sums = new Float64Array(names.length);
    this.count = 0;
    this.samples = 0;
  }

  /** Add n samples of k = names.length values each (`values` holds n*k floats, sample by sample). */
  push(values, n) {
    const k = this.names.length;
    for (let i = 0; i < n; i++) {
      for (let j = 0; j < k; j++) this.sums[j] += values[i * k + j];
      if (++this.count === this.perColumn) {
        for (let j = 0; j < k; j++) {
          const column = this.columns[j];
          column.push(this.sums[j] / this.count);
          if (column.length > this.slots) column.shift();
          this.sums[j] = 0;
        }
        this.count = 0;
      }
    }
    this.samples += n;
  }

  bounds() {
    if (this.range) return this.range;
    let lo = Infinity, hi = -Infinity;
    for (const column of this.columns) {
      for (const v of column) {
        if (Number.isFinite(v)) {
          lo = Math.min(lo, v);
          hi = Math.max(hi, v);
        }
      }
    }
    if (!Number.isFinite(lo)) return [0, 1];
    const pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.05 || 1;
    return [lo - pad, hi + pad];
  }

  draw() {
    const g = this.canvas.getContext("2d");
    const { width: w, height: h } = this.canvas;
    const [lo, hi] = this.bounds();
    const y = (v) => h - 16 - ((v - lo) / (hi - lo)) * (h - 32);
    g.fillStyle = "#fff";
    g.fillRect(0, 0, w, h);
    g.strokeStyle = "#ccc";
    g.strokeRect(MARGIN, 0, w - MARGIN, h);
    g.fillStyle = "#333";
    g.font = "11px sans-serif";
    g.fillText(hi.toPrecision(3), 2, 14);
    g.fillText(lo.toPrecision(3), 2, h - 18);
    g.fillText(this.unit, 2, h / 2);
    g.fillText(`${this.perColumn} samples per column, ${this.samples} samples so far`, MARGIN + 4, h - 3);
    this.columns.forEach((column, j) => {
      const color = COLORS[j % COLORS.length];
      g.strokeStyle = color;
      g.beginPath();
      const x = (i) => w - 1 - (column.length - 1 - i) * this.step;
      column.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
      g.stroke();
      g.fillStyle = color;
      const last = column.length ? ` ${column[column.length - 1].toPrecision(3)}` : "";
      if (j < 12) g.fillText(`${this.names[j]}${last}`, MARGIN + 6 + (j % 4) * 140, 14 + Math.floor(j / 4) * 13);
    });
  }
}
