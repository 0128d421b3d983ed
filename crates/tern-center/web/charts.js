// tern web client (charts.js): the charts of the center's UI, as window.TernCharts —
//   TernCharts.line(container, opts)       a line chart (one or two y axes) with a legend
//   TernCharts.sparkline(container, opts)  a tiny inline chart for table rows
//   TernCharts.niceMax(v)                  the "nice" rounding of axis maxima
// This file owns the SVG and the legend it puts in the containers app.js hands it (it
// replaces their children, reusing its own nodes on re-render); app.js owns everything else.
//
// Vanilla ES2020, no build step, no framework, no event listeners. The page's
// Content-Security-Policy (script-src 'self'; style-src 'self') forbids inline styles, so
// everything is drawn with SVG presentation attributes (fill, stroke, opacity, font-size…);
// text and axes use currentColor so they follow the page's colour scheme, and the series
// colours read on both the light and the dark backgrounds (>= 3:1 on each). app.css may
// override any of it through the classes below (a stylesheet beats presentation attributes).
// Every name and title is untrusted: it reaches the page only through textContent and
// setAttribute, never as markup.
//
// Classes: .chart (wrapper div) > svg.chart-svg + div.chart-legend > span.chart-legend-item >
// svg.chart-swatch + span.chart-legend-name + span.chart-legend-value; inside the SVG:
// .chart-grid, .chart-axis, .chart-tick, .chart-band, .chart-band-label, .chart-area,
// .chart-line, .chart-dot, .chart-empty; svg.chart-sparkline for sparklines.
(function () {
  'use strict';

  const SVG_NS = 'http://www.w3.org/2000/svg';
  // Okabe-Ito-like hues, darkened or lightened so that each has a contrast of at least 3:1
  // against the light (#fff, #f4f5f7) and the dark (#1c2027, #15181d) backgrounds.
  const PALETTE = Object.freeze([
    '#3b82d6', // blue
    '#c27512', // orange
    '#009e73', // bluish green
    '#cf5f96', // reddish purple
    '#9a70d8', // violet
    '#1b93b5', // sky
  ]);
  const FONT = 11; // px (the viewBox follows the element's width, so 1 unit = 1 px)
  const CHAR_W = 6.4; // a generous estimate of a character's width at FONT
  const DEFAULT_WIDTH = 600;
  const DEFAULT_HEIGHT = 180;
  const SPARK_W = 120;
  const SPARK_H = 28;
  const TIME_STEPS = [
    1e3, 2e3, 5e3, 1e4, 15e3, 3e4, 6e4, 12e4, 3e5, 6e5, 9e5, 18e5, 36e5, 72e5, 108e5, 216e5,
    432e5, 864e5,
  ];

  const charts = new WeakMap(); // container → {wrap, svg, legend, clipId}
  const sparks = new WeakMap(); // container → svg
  let clipSeq = 0;

  // ---- small helpers ----

  function isNum(v) {
    return typeof v === 'number' && isFinite(v);
  }

  function svgEl(tag, attrs, children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const k in attrs) {
      const v = attrs[k];
      if (v !== undefined && v !== null && v !== false) node.setAttribute(k, String(v));
    }
    if (children) for (const c of children) if (c) node.appendChild(c);
    return node;
  }

  function svgText(text, attrs) {
    const node = svgEl('text', attrs);
    node.textContent = text;
    return node;
  }

  function htmlEl(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** Rounds away the binary noise of tick arithmetic (0.30000000000000004 → 0.3). */
  function clean(v) {
    return Number(v.toPrecision(12));
  }

  /** A coordinate for a path: one decimal, bounded so that wild values stay drawable. */
  function co(v) {
    if (v > 1e6) v = 1e6;
    else if (v < -1e6) v = -1e6;
    return Math.round(v * 10) / 10;
  }

  /** A compact number: up to 3 significant digits, k/M/G/T above 10 000. */
  function fmtNum(v) {
    if (!isNum(v)) return '–';
    const a = Math.abs(v);
    const units = [
      [1e12, 'T'],
      [1e9, 'G'],
      [1e6, 'M'],
      [1e4, 'k'],
    ];
    for (const [d, s] of units) if (a >= d) return trimNum(v / d) + s;
    return trimNum(v);
  }

  function trimNum(v) {
    if (v === 0) return '0';
    const a = Math.abs(v);
    if (a >= 100) return String(Math.round(v));
    const digits = a >= 10 ? 1 : a >= 1 ? 2 : Math.min(6, 2 - Math.floor(Math.log10(a)));
    return String(Number(v.toFixed(digits)));
  }

  function pad2(n) {
    return n < 10 ? '0' + n : String(n);
  }

  function fmtClock(ms) {
    const d = new Date(ms);
    if (isNaN(d)) return '–';
    return pad2(d.getHours()) + ':' + pad2(d.getMinutes()) + ':' + pad2(d.getSeconds());
  }

  /** x values that look like epoch milliseconds (1973 … 5138) get time-friendly ticks. */
  function looksLikeTime(x0, x1) {
    return x0 > 1e11 && x1 < 1e14;
  }

  /** Calls a caller's format function, falling back to fmtNum if it is missing or throws. */
  function callFmt(fn, v) {
    if (typeof fn === 'function') {
      try {
        const s = fn(v);
        if (s !== undefined && s !== null) return String(s);
      } catch (_) {
        // fall through to the default
      }
    }
    return fmtNum(v);
  }

  /** A value with its unit: the unit is added unless the formatted value already has one
   *  (i.e. it holds letters other than a single trailing k/M/G/T, or a % or /). */
  function withUnit(s, unit) {
    if (!unit) return s;
    unit = String(unit);
    if (s.includes(unit) || /[%/]/.test(s) || !/^[^A-Za-z\u00b5]*[kMGTP]?$/.test(s)) return s;
    if (unit === '%') return s + unit;
    const m = /^(.*\d)([kMGTP])$/.exec(s); // 68G + B → 68 GB
    return m ? m[1] + ' ' + m[2] + unit : s + ' ' + unit;
  }

  // ---- nice numbers ----

  /** The smallest step of 1, 2, 2.5 or 5 × 10^n that is at least raw. */
  function niceStep(raw) {
    if (!(raw > 0) || !isFinite(raw)) return 1;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) {
      if (m * mag >= raw * (1 - 1e-9)) return clean(m * mag);
    }
    return clean(10 * mag);
  }

  /** A step for epoch-millisecond axes: whole seconds, minutes, hours or days. */
  function timeStep(raw) {
    if (raw < 1000) return niceStep(raw);
    for (const s of TIME_STEPS) if (s >= raw) return s;
    return niceStep(raw / 864e5) * 864e5;
  }

  /** Nice bounds and ticks for lo..hi with about n intervals; a fixed bound is kept as is. */
  function niceAxis(lo, hi, n, fixedMin, fixedMax) {
    if (!(hi > lo)) hi = lo + (Math.abs(lo) || 1);
    const step = niceStep((hi - lo) / n);
    const min = fixedMin ? lo : clean(Math.floor(lo / step + 1e-9) * step);
    let max = fixedMax ? hi : clean(Math.ceil(hi / step - 1e-9) * step);
    if (!(max > min)) max = clean(min + step);
    return { min, max, step, ticks: ticksIn(min, max, step) };
  }

  function ticksIn(min, max, step) {
    const ticks = [];
    const first = Math.ceil(min / step - 1e-9);
    for (let i = first; ticks.length < 50; i++) {
      const t = clean(i * step);
      if (t > max + step * 1e-9) break;
      ticks.push(t);
    }
    return ticks;
  }

  /** The nice maximum of an axis going from 0 to above v (about 4 intervals): 12.5 → 15,
   *  100 → 100, 2.7e9 → 3e9. 1 for 0, negative or non-finite values. */
  function niceMax(v) {
    if (!isNum(v) || v <= 0) return 1;
    return niceAxis(0, v, 4, false, false).max;
  }

  // ---- data ----

  /** The finite y values of the series on one axis: {lo, hi} or null when there is none. */
  function extent(series) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const s of series) {
      for (const p of s.points) {
        if (!p || !isNum(p.y) || !isNum(p.x)) continue;
        if (p.y < lo) lo = p.y;
        if (p.y > hi) hi = p.y;
      }
    }
    return lo <= hi ? { lo, hi } : null;
  }

  /** The last point with a finite value, or null. */
  function latest(points) {
    for (let i = points.length - 1; i >= 0; i--) {
      const p = points[i];
      if (p && isNum(p.x) && isNum(p.y)) return p;
    }
    return null;
  }

  function normSeries(list) {
    if (!Array.isArray(list)) return [];
    return list
      .filter((s) => s && typeof s === 'object')
      .map((s, i) => ({
        name: s.name === undefined || s.name === null || s.name === '' ? 'series ' + (i + 1) : String(s.name),
        unit: s.unit === undefined || s.unit === null ? '' : String(s.unit),
        axis: s.axis === 'right' ? 'right' : 'left',
        points: Array.isArray(s.points) ? s.points : [],
        dashed: !!s.dashed,
        area: !!s.area,
        color: PALETTE[i % PALETTE.length],
      }));
  }

  /**
   * Turns points into runs of screen coordinates (a null, NaN or infinite y ends a run).
   * Runs much denser than the pixels are reduced to the first, lowest, highest and last
   * point of each pixel column, which draws the same picture.
   */
  function runsOf(points, sx, sy, plotW) {
    const runs = [];
    let xs = [];
    let ys = [];
    const flush = () => {
      if (xs.length) runs.push(xs.length > 2 * plotW + 8 ? decimate(xs, ys) : { xs, ys });
      xs = [];
      ys = [];
    };
    for (const p of points) {
      if (!p || !isNum(p.x)) continue;
      if (!isNum(p.y)) {
        flush();
        continue;
      }
      xs.push(sx(p.x));
      ys.push(sy(p.y));
    }
    flush();
    return runs;
  }

  function decimate(xs, ys) {
    const ox = [];
    const oy = [];
    let i = 0;
    while (i < xs.length) {
      const col = Math.floor(xs[i]);
      let j = i;
      let lo = i;
      let hi = i;
      while (j + 1 < xs.length && Math.floor(xs[j + 1]) === col) {
        j++;
        if (ys[j] < ys[lo]) lo = j;
        if (ys[j] > ys[hi]) hi = j;
      }
      const keep = [i, lo, hi, j].sort((a, b) => a - b);
      let prev = -1;
      for (const k of keep) {
        if (k === prev) continue;
        ox.push(xs[k]);
        oy.push(ys[k]);
        prev = k;
      }
      i = j + 1;
    }
    return { xs: ox, ys: oy };
  }

  function lineD(runs) {
    const parts = [];
    for (const { xs, ys } of runs) {
      parts.push('M' + co(xs[0]) + ' ' + co(ys[0]));
      // a lone point between gaps: a zero-length segment, drawn as a dot by the round cap
      if (xs.length === 1) parts.push('L' + co(xs[0]) + ' ' + co(ys[0]));
      for (let i = 1; i < xs.length; i++) parts.push('L' + co(xs[i]) + ' ' + co(ys[i]));
    }
    return parts.join('');
  }

  function areaD(runs, base) {
    const b = co(base);
    const parts = [];
    for (const { xs, ys } of runs) {
      const last = xs.length - 1;
      parts.push('M' + co(xs[0]) + ' ' + b);
      for (let i = 0; i <= last; i++) parts.push('L' + co(xs[i]) + ' ' + co(ys[i]));
      parts.push('L' + co(xs[last]) + ' ' + b + 'Z');
    }
    return parts.join('');
  }

  // ---- layout ----

  /** The width the SVG is shown at, so that one viewBox unit is one pixel (readable text);
   *  0 when it cannot be known yet (the container is not in the page). */
  function measure(container, svg) {
    let w = 0;
    try {
      if (svg && svg.isConnected) w = svg.getBoundingClientRect().width;
      if (!(w > 0) && container.isConnected) {
        const cs = getComputedStyle(container);
        w = container.clientWidth - (parseFloat(cs.paddingLeft) || 0) - (parseFloat(cs.paddingRight) || 0);
      }
    } catch (_) {
      w = 0;
    }
    return w > 0 ? Math.max(200, Math.min(4000, Math.round(w))) : 0;
  }

  /** The x range: fixed bounds, else the data's (and the bands'), else 0..1. */
  function xRange(opts, series, bands) {
    let lo = Infinity;
    let hi = -Infinity;
    for (const s of series) {
      for (const p of s.points) {
        if (!p || !isNum(p.x)) continue;
        if (p.x < lo) lo = p.x;
        if (p.x > hi) hi = p.x;
      }
    }
    for (const b of bands) {
      lo = Math.min(lo, b.x0);
      hi = Math.max(hi, b.x1);
    }
    const hasData = lo <= hi;
    if (isNum(opts.xMin)) lo = opts.xMin;
    if (isNum(opts.xMax)) hi = opts.xMax;
    if (!(lo <= hi)) {
      if (isNum(opts.xMin) && !isNum(opts.xMax)) hi = lo;
      else if (isNum(opts.xMax) && !isNum(opts.xMin)) lo = hi;
      else if (!hasData) return { x0: 0, x1: 1, known: false };
    }
    if (!(hi > lo)) {
      // a single point (or a fixed empty range): a small range around it
      const c = lo;
      const d = Math.abs(c) > 1e11 ? 30000 : Math.max(1, Math.abs(c) * 0.05);
      lo = isNum(opts.xMin) ? opts.xMin : c - d;
      hi = isNum(opts.xMax) && opts.xMax > lo ? opts.xMax : Math.max(c + d, lo + d);
    }
    return { x0: lo, x1: hi, known: true };
  }

  /** x ticks whose labels do not overlap. */
  function xTickList(x0, x1, target, fmt, plotW) {
    const time = looksLikeTime(x0, x1);
    let n = Math.max(1, Math.min(20, Math.round(target)));
    for (let tries = 0; tries < 8; tries++) {
      const raw = (x1 - x0) / n;
      const step = time ? timeStep(raw) : niceStep(raw);
      let ticks;
      if (time && step >= 36e5) {
        // whole local hours and days
        const off = -new Date(x0).getTimezoneOffset() * 6e4;
        ticks = ticksIn(x0 + off, x1 + off, step).map((t) => t - off);
      } else {
        ticks = ticksIn(x0, x1, step);
      }
      const labels = ticks.map((t) => callFmt(fmt, t));
      const widest = labels.reduce((m, s) => Math.max(m, s.length), 0) * CHAR_W + 12;
      if (ticks.length <= 1 || widest * ticks.length <= plotW) return { ticks, labels };
      n = Math.max(1, Math.floor(n / 2));
      if (n === 1 && tries > 2) return { ticks: ticks.slice(0, 1), labels: labels.slice(0, 1) };
    }
    return { ticks: [], labels: [] };
  }

  // ---- the line chart ----

  function line(container, opts) {
    if (!container || typeof container.appendChild !== 'function') return;
    opts = opts || {};
    const title = opts.title === undefined || opts.title === null ? 'Chart' : String(opts.title);
    const series = normSeries(opts.series);
    const bands = (Array.isArray(opts.bands) ? opts.bands : [])
      .filter((b) => b && isNum(b.x0) && isNum(b.x1))
      .map((b) => ({
        x0: Math.min(b.x0, b.x1),
        x1: Math.max(b.x0, b.x1),
        label: b.label === undefined || b.label === null ? '' : String(b.label),
      }));
    const xFmt = typeof opts.xFormat === 'function' ? opts.xFormat : null;
    const height = isNum(opts.height) && opts.height >= 60 ? Math.round(opts.height) : DEFAULT_HEIGHT;

    // the nodes of a previous rendering into this container, when they are still there
    let st = charts.get(container);
    if (!st || st.wrap.parentNode !== container) {
      const wrap = htmlEl('div', 'chart');
      const svg = svgEl('svg', { class: 'chart-svg', role: 'img', focusable: 'false' });
      const legend = htmlEl('div', 'chart-legend');
      wrap.append(svg, legend);
      st = { wrap, svg, legend, clipId: 'tern-chart-clip-' + ++clipSeq };
      charts.set(container, st);
      container.replaceChildren(wrap);
    } else if (container.childNodes.length !== 1) {
      container.replaceChildren(st.wrap);
    }
    const measured = measure(container, st.svg);
    const width = measured || st.width || DEFAULT_WIDTH;
    st.width = width;
    const seq = (st.seq = (st.seq || 0) + 1);
    if (!measured && typeof requestAnimationFrame === 'function') {
      // not in the page yet (app.js builds, then inserts): once it is, draw again at its real
      // width, unless a newer rendering came first
      requestAnimationFrame(() => {
        if (charts.get(container) !== st || st.seq !== seq) return;
        const w = measure(container, st.svg);
        if (w && w !== width) line(container, opts);
      });
    }

    // y axes
    const leftSeries = series.filter((s) => s.axis === 'left');
    const rightSeries = series.filter((s) => s.axis === 'right');
    const drawRight = rightSeries.length > 0;
    const drawLeft = leftSeries.length > 0 || !drawRight;
    const top = bands.some((b) => b.label) ? 20 : 8;
    const bottom = 22;
    const plotH = height - top - bottom;
    const nY = Math.max(2, Math.min(6, Math.floor(plotH / 32)));
    const yAxis = (list, fmin, fmax) => {
      const e = extent(list);
      const hasMin = isNum(fmin);
      let hasMax = isNum(fmax);
      const lo = hasMin ? fmin : Math.min(0, e ? e.lo : 0);
      let hi = hasMax ? fmax : Math.max(0, e ? e.hi : 0);
      if (hasMax && !(hi > lo)) hasMax = false;
      if (!hasMax) hi = Math.max(hi, lo);
      if (!(hi > lo) && !hasMax) hi = lo === 0 ? 1 : lo + Math.abs(lo);
      return { axis: niceAxis(lo, hi, nY, hasMin, hasMax), e, auto: !hasMin && !hasMax };
    };
    const L = drawLeft ? yAxis(leftSeries, opts.leftMin, opts.leftMax) : null;
    let R = drawRight ? yAxis(rightSeries, opts.rightMin, opts.rightMax) : null;
    if (L && R && L.auto && R.auto && L.axis.min === 0 && (!R.e || R.e.lo >= 0)) {
      // line the right ticks up with the left grid
      const k = Math.round(L.axis.max / L.axis.step);
      const hi = R.e && R.e.hi > 0 ? R.e.hi : 1;
      const step = niceStep(hi / k);
      const ticks = [];
      for (let i = 0; i <= k; i++) ticks.push(clean(i * step));
      R = { axis: { min: 0, max: clean(k * step), step, ticks }, e: R.e, auto: true };
    }
    const leftAxis = L ? L.axis : null;
    const rightAxis = R ? R.axis : null;
    const leftLabels = leftAxis ? leftAxis.ticks.map((t) => callFmt(opts.leftFormat, t)) : [];
    const rightLabels = rightAxis ? rightAxis.ticks.map((t) => callFmt(opts.rightFormat, t)) : [];
    const widest = (labels) => labels.reduce((m, s) => Math.max(m, s.length), 0) * CHAR_W;
    const left = drawLeft ? Math.max(24, Math.ceil(widest(leftLabels) + 10)) : 10;
    const right = drawRight ? Math.max(24, Math.ceil(widest(rightLabels) + 10)) : 12;
    const px0 = left;
    const px1 = Math.max(px0 + 20, width - right);
    const py0 = top;
    const py1 = height - bottom;
    const plotW = px1 - px0;

    // x axis
    const xr = xRange(opts, series, bands);
    const sx = (x) => px0 + ((x - xr.x0) / (xr.x1 - xr.x0)) * plotW;
    const syOf = (a) => (y) => py1 - ((y - a.min) / (a.max - a.min)) * (py1 - py0);
    const xFormat = xFmt || (looksLikeTime(xr.x0, xr.x1) ? fmtClock : fmtNum);
    const xt = xr.known
      ? xTickList(xr.x0, xr.x1, isNum(opts.xTicks) ? opts.xTicks : 5, xFormat, plotW)
      : { ticks: [], labels: [] };

    const nodes = [];
    const gridAxis = leftAxis || rightAxis;
    const gridSy = syOf(gridAxis);

    // clip for the data
    nodes.push(
      svgEl('defs', {}, [
        svgEl('clipPath', { id: st.clipId }, [
          svgEl('rect', { x: px0, y: py0 - 3, width: plotW, height: py1 - py0 + 6 }),
        ]),
      ])
    );

    // grid
    const grid = svgEl('g', {
      class: 'chart-grid',
      stroke: 'currentColor',
      'stroke-width': 1,
      opacity: 0.15,
      'shape-rendering': 'crispEdges',
    });
    for (const t of gridAxis.ticks) {
      const y = co(gridSy(t));
      grid.appendChild(svgEl('line', { x1: px0, x2: px1, y1: y, y2: y }));
    }
    nodes.push(grid);

    // bands (behind the data), at least 2 px wide
    const bandG = svgEl('g', { class: 'chart-band', fill: 'currentColor', 'clip-path': 'url(#' + st.clipId + ')' });
    const bandLabels = svgEl('g', {
      class: 'chart-band-label',
      fill: 'currentColor',
      'font-size': FONT,
    });
    for (const b of bands) {
      let bx0 = sx(b.x0);
      let bx1 = sx(b.x1);
      if (bx1 < px0 || bx0 > px1) continue;
      if (bx1 - bx0 < 2) {
        const mid = (bx0 + bx1) / 2;
        bx0 = mid - 1;
        bx1 = mid + 1;
      }
      bandG.appendChild(
        svgEl('rect', {
          x: co(bx0),
          y: py0,
          width: co(bx1 - bx0),
          height: py1 - py0,
          opacity: bx1 - bx0 < 6 ? 0.35 : 0.13,
        })
      );
      if (b.label) {
        const mid = (Math.max(bx0, px0) + Math.min(bx1, px1)) / 2;
        const w = b.label.length * CHAR_W;
        let anchor = 'middle';
        let tx = mid;
        if (mid - w / 2 < 0) {
          anchor = 'start';
          tx = Math.max(0, Math.max(bx0, px0));
        } else if (mid + w / 2 > width) {
          anchor = 'end';
          tx = Math.min(width, Math.min(bx1, px1));
        }
        bandLabels.appendChild(svgText(b.label, { x: co(tx), y: py0 - 6, 'text-anchor': anchor }));
      }
    }
    nodes.push(bandG);

    // axis lines: the x axis at the bottom, a zero line when the left axis goes below 0
    const axisG = svgEl('g', {
      class: 'chart-axis',
      stroke: 'currentColor',
      'stroke-width': 1,
      opacity: 0.45,
      'shape-rendering': 'crispEdges',
    });
    axisG.appendChild(svgEl('line', { x1: px0, x2: px1, y1: py1, y2: py1 }));
    if (gridAxis.min < 0 && gridAxis.max > 0) {
      const y0 = co(gridSy(0));
      axisG.appendChild(svgEl('line', { x1: px0, x2: px1, y1: y0, y2: y0 }));
    }
    for (const t of xt.ticks) {
      const x = co(sx(t));
      axisG.appendChild(svgEl('line', { x1: x, x2: x, y1: py1, y2: py1 + 4 }));
    }
    nodes.push(axisG);

    // data
    const data = svgEl('g', { 'clip-path': 'url(#' + st.clipId + ')' });
    const dots = svgEl('g', { class: 'chart-dot' });
    let anyData = false;
    const summary = [];
    const legendItems = [];
    for (const s of series) {
      const a = s.axis === 'right' ? rightAxis : leftAxis;
      const fmt = s.axis === 'right' ? opts.rightFormat : opts.leftFormat;
      const sy = syOf(a);
      const runs = runsOf(s.points, sx, sy, plotW);
      const last = latest(s.points);
      if (runs.length) anyData = true;
      if (runs.length && s.area) {
        const base = sy(Math.min(Math.max(0, a.min), a.max));
        data.appendChild(
          svgEl('path', { class: 'chart-area', d: areaD(runs, base), fill: s.color, opacity: 0.15, stroke: 'none' })
        );
      }
      if (runs.length) {
        data.appendChild(
          svgEl('path', {
            class: 'chart-line',
            d: lineD(runs),
            fill: 'none',
            stroke: s.color,
            'stroke-width': 1.75,
            'stroke-linejoin': 'round',
            'stroke-linecap': 'round',
            'stroke-dasharray': s.dashed ? '6 4' : null,
          })
        );
      }
      if (last && last.x >= xr.x0 && last.x <= xr.x1 && last.y >= a.min && last.y <= a.max) {
        dots.appendChild(svgEl('circle', { cx: co(sx(last.x)), cy: co(sy(last.y)), r: 3, fill: s.color }));
      }
      const value = last ? withUnit(callFmt(fmt, last.y), s.unit) : null;
      summary.push(s.name + ' ' + (value === null ? 'no data' : value));
      legendItems.push(legendItem(s, value === null ? '–' : value));
    }
    nodes.push(data, dots);

    // tick labels
    const labels = svgEl('g', { class: 'chart-tick', fill: 'currentColor', 'font-size': FONT });
    if (leftAxis) {
      const sy = syOf(leftAxis);
      leftAxis.ticks.forEach((t, i) => {
        labels.appendChild(svgText(leftLabels[i], { x: px0 - 6, y: co(sy(t) + 4), 'text-anchor': 'end' }));
      });
    }
    if (rightAxis) {
      const sy = syOf(rightAxis);
      rightAxis.ticks.forEach((t, i) => {
        labels.appendChild(svgText(rightLabels[i], { x: px1 + 6, y: co(sy(t) + 4), 'text-anchor': 'start' }));
      });
    }
    xt.ticks.forEach((t, i) => {
      const x = sx(t);
      const w = xt.labels[i].length * CHAR_W;
      let anchor = 'middle';
      let tx = x;
      if (x - w / 2 < 0) {
        anchor = 'start';
        tx = 0;
      } else if (x + w / 2 > width) {
        anchor = 'end';
        tx = width;
      }
      labels.appendChild(svgText(xt.labels[i], { x: co(tx), y: py1 + 16, 'text-anchor': anchor }));
    });
    nodes.push(labels, bandLabels);

    if (!anyData) {
      nodes.push(
        svgText('No data yet', {
          class: 'chart-empty',
          x: co((px0 + px1) / 2),
          y: co((py0 + py1) / 2 + 4),
          'text-anchor': 'middle',
          fill: 'currentColor',
          'font-size': FONT + 1,
          opacity: 0.75,
        })
      );
    }

    // the accessible name: the title, each series' latest value, the bands
    let label = title + ': ' + (anyData ? summary.join(', ') : 'no data yet');
    const bandText = bands.map((b) => {
      const a = callFmt(xFormat, b.x0);
      const z = callFmt(xFormat, b.x1);
      return (b.label || 'marked period') + ' (' + (a === z ? a : a + '–' + z) + ')';
    });
    if (bandText.length) label += '; ' + bandText.join(', ');

    const svg = st.svg;
    svg.setAttribute('viewBox', '0 0 ' + width + ' ' + height);
    svg.setAttribute('width', '100%');
    svg.setAttribute('height', String(height));
    svg.setAttribute('aria-label', label);
    if (opts.id !== undefined && opts.id !== null && opts.id !== '') svg.setAttribute('id', String(opts.id));
    else svg.removeAttribute('id');
    svg.replaceChildren(...nodes);
    st.legend.replaceChildren(...legendItems);
    st.legend.hidden = legendItems.length === 0;
  }

  function legendItem(s, value) {
    const item = htmlEl('span', 'chart-legend-item');
    const sw = svgEl('svg', {
      class: 'chart-swatch',
      width: 16,
      height: 10,
      viewBox: '0 0 16 10',
      'aria-hidden': 'true',
      focusable: 'false',
    });
    if (s.area) sw.appendChild(svgEl('rect', { x: 0, y: 0, width: 16, height: 10, fill: s.color, opacity: 0.2 }));
    sw.appendChild(
      svgEl('line', {
        x1: 1,
        y1: 5,
        x2: 15,
        y2: 5,
        stroke: s.color,
        'stroke-width': 2.5,
        'stroke-linecap': 'round',
        'stroke-dasharray': s.dashed ? '4 3' : null,
      })
    );
    item.append(sw, ' ', htmlEl('span', 'chart-legend-name', s.name), ' ', htmlEl('span', 'chart-legend-value', value));
    return item;
  }

  // ---- the sparkline ----

  function sparkline(container, opts) {
    if (!container || typeof container.appendChild !== 'function') return;
    opts = opts || {};
    const title = opts.title === undefined || opts.title === null ? 'Trend' : String(opts.title);
    const points = Array.isArray(opts.points) ? opts.points : [];
    const unit = opts.unit === undefined || opts.unit === null ? '' : String(opts.unit);

    let svg = sparks.get(container);
    if (!svg || svg.parentNode !== container) {
      svg = svgEl('svg', {
        class: 'chart-sparkline',
        role: 'img',
        focusable: 'false',
        width: SPARK_W,
        height: SPARK_H,
        viewBox: '0 0 ' + SPARK_W + ' ' + SPARK_H,
      });
      sparks.set(container, svg);
      container.replaceChildren(svg);
    } else if (container.childNodes.length !== 1) {
      container.replaceChildren(svg);
    }

    let x0 = Infinity;
    let x1 = -Infinity;
    let lo = Infinity;
    let hi = -Infinity;
    for (const p of points) {
      if (!p || !isNum(p.x)) continue;
      if (p.x < x0) x0 = p.x;
      if (p.x > x1) x1 = p.x;
      if (!isNum(p.y)) continue;
      if (p.y < lo) lo = p.y;
      if (p.y > hi) hi = p.y;
    }
    const last = latest(points);
    const nodes = [];
    const padX = 3;
    const padY = 3;
    if (last) {
      const min = isNum(opts.min) ? opts.min : Math.min(0, lo);
      let max = isNum(opts.max) ? opts.max : hi;
      if (!(max > min)) max = min + (Math.abs(min) || 1);
      if (!(x1 > x0)) {
        x0 -= 1;
        x1 += 1;
      }
      const sx = (x) => padX + ((x - x0) / (x1 - x0)) * (SPARK_W - 2 * padX);
      const sy = (y) => {
        const v = Math.min(max, Math.max(min, y));
        return SPARK_H - padY - ((v - min) / (max - min)) * (SPARK_H - 2 * padY);
      };
      const runs = runsOf(points, sx, sy, SPARK_W);
      const base = sy(Math.min(Math.max(0, min), max));
      nodes.push(svgEl('path', { class: 'chart-area', d: areaD(runs, base), fill: PALETTE[0], opacity: 0.15 }));
      nodes.push(
        svgEl('path', {
          class: 'chart-line',
          d: lineD(runs),
          fill: 'none',
          stroke: PALETTE[0],
          'stroke-width': 1.5,
          'stroke-linejoin': 'round',
          'stroke-linecap': 'round',
        })
      );
      nodes.push(svgEl('circle', { class: 'chart-dot', cx: co(sx(last.x)), cy: co(sy(last.y)), r: 2, fill: PALETTE[0] }));
    } else {
      const y = SPARK_H - padY;
      nodes.push(
        svgEl('line', {
          class: 'chart-axis',
          x1: padX,
          x2: SPARK_W - padX,
          y1: y,
          y2: y,
          stroke: 'currentColor',
          opacity: 0.3,
          'stroke-dasharray': '2 3',
        })
      );
    }
    const value = last ? withUnit(callFmt(opts.format, last.y), unit) : 'no data';
    svg.setAttribute('aria-label', title + ': ' + value);
    svg.replaceChildren(...nodes);
  }

  window.TernCharts = Object.freeze({ line, sparkline, niceMax });
})();
