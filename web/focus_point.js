/**
 * GenRefocus click-to-focus for the Focus Point node (GenRefocus_FocusPoint).
 *
 * After a run with the photo wired into the node's `image` input, the frontend shows the photo
 * inside the node (the node returns a preview). A click on that picture sets the `x` and `y`
 * widgets to the clicked spot, as fractions of the picture's width and height (0..1, measured on
 * the picture as drawn, so the letterbox bars around it do not count), and a crosshair marks the
 * current (x, y) over the picture, also while the widgets are edited by hand. The widgets stay the
 * source of truth: they are what the next run uses and what the workflow saves. Dragging the
 * picture still moves the node. Before the first run there is no picture: a hint says so and a
 * click does what a click on any node does.
 *
 * Written for the ComfyUI frontend 1.27 (comfyui-frontend-package), which draws previews with a
 * canvas widget named "$$canvas-image-preview". The picture's rectangle is taken from that
 * widget's own drawImage call, not recomputed, so the frontend's layout rules (no upscaling,
 * centring, the size line under the image) are followed as they are. Plain ES module, no build.
 */
import { app } from "../../scripts/app.js";

const NODE_TYPE = "GenRefocus_FocusPoint";
const PREVIEW_WIDGET = "$$canvas-image-preview";
const HINT_NO_IMAGE = "run once to see the image";
const COLOUR = "#ffcc33";
const DIGITS = 3; // the widgets' step is 0.001

const widgetNamed = (node, name) => node.widgets?.find((w) => w.name === name);
const clamp01 = (v) => Math.min(1, Math.max(0, v));

/** The image the preview shows on its own (one image, or one picked from a batch), else null. */
function shownImage(node) {
    const imgs = node.imgs ?? [];
    if (!imgs.length) return null;
    const index = node.imageIndex ?? (imgs.length === 1 ? 0 : null);
    return index == null ? null : (imgs[index] ?? null);
}

/** Current (x, y) from the widgets, or null when they are missing or not numbers. */
function focusOf(node) {
    const x = Number(widgetNamed(node, "x")?.value);
    const y = Number(widgetNamed(node, "y")?.value);
    return Number.isFinite(x) && Number.isFinite(y) ? [x, y] : null;
}

/** Normalised (x, y) of a graph-space point on the drawn picture, or null outside it. */
function pointOnImage(node, canvasX, canvasY) {
    const r = node.genrefocusImageRect;
    if (!r || r.w <= 0 || r.h <= 0) return null;
    const u = (canvasX - node.pos[0] - r.x) / r.w;
    const v = (canvasY - node.pos[1] - r.y) / r.h;
    if (u < 0 || u > 1 || v < 0 || v > 1) return null;
    return [u, v];
}

/** The batch navigation buttons the frontend draws over a picked image ("x", "1/2"). */
function onBatchButton(node, canvasX, canvasY) {
    if ((node.imgs?.length ?? 0) < 2) return false;
    const lx = canvasX - node.pos[0];
    const ly = canvasY - node.pos[1];
    const top = widgetNamed(node, PREVIEW_WIDGET)?.last_y ?? 0;
    return lx > node.size[0] - 46 && (ly < top + 46 || ly > node.size[1] - 56);
}

function setFocus(node, x, y, e) {
    const canvas = app.canvas;
    const graph = node.graph;
    canvas?.emitBeforeChange?.();
    graph?.beforeChange?.();
    try {
        for (const [name, value] of [["x", x], ["y", y]]) {
            const w = widgetNamed(node, name);
            if (!w) continue;
            const v = Number(clamp01(value).toFixed(DIGITS));
            if (typeof w.setValue === "function") {
                w.setValue(v, { e, node, canvas }); // callback, onWidgetChanged, graph version
            } else {
                const old = w.value;
                w.value = v;
                w.callback?.(w.value, canvas, node, canvas?.graph_mouse, e);
                node.onWidgetChanged?.(name, w.value, old, w);
                if (graph) graph._version++;
            }
        }
    } finally {
        graph?.afterChange?.();
        canvas?.emitAfterChange?.();
    }
    node.setDirtyCanvas?.(true, true);
    graph?.change?.();
}

function strokeCross(ctx, cx, cy, arm, gap) {
    ctx.beginPath();
    ctx.moveTo(cx - arm, cy);
    ctx.lineTo(cx - gap, cy);
    ctx.moveTo(cx + gap, cy);
    ctx.lineTo(cx + arm, cy);
    ctx.moveTo(cx, cy - arm);
    ctx.lineTo(cx, cy - gap);
    ctx.moveTo(cx, cy + gap);
    ctx.lineTo(cx, cy + arm);
    ctx.stroke();
    ctx.beginPath();
    ctx.arc(cx, cy, gap + 1, 0, Math.PI * 2);
    ctx.stroke();
}

/** Crosshair at the widgets' (x, y) over the drawn picture, and a one-line status under it. */
function drawOverlay(node, ctx) {
    const r = node.genrefocusImageRect;
    const focus = focusOf(node);
    if (!r || !focus) return;
    const [fx, fy] = focus.map(clamp01);
    const cx = r.x + fx * r.w;
    const cy = r.y + fy * r.h;
    const arm = Math.max(10, Math.min(24, Math.min(r.w, r.h) / 8));
    const gap = 4;
    ctx.save();
    ctx.beginPath();
    ctx.rect(r.x, r.y, r.w, r.h);
    ctx.clip();
    ctx.lineCap = "round";
    ctx.strokeStyle = "rgba(0, 0, 0, 0.8)";
    ctx.lineWidth = 4;
    strokeCross(ctx, cx, cy, arm, gap);
    ctx.strokeStyle = COLOUR;
    ctx.lineWidth = 2;
    strokeCross(ctx, cx, cy, arm, gap);
    ctx.restore();

    const last = node.genrefocusLastPoint;
    const stale = last && (Math.abs(last[0] - fx) > 5e-4 || Math.abs(last[1] - fy) > 5e-4);
    const text = stale
        ? `focus ${fx.toFixed(DIGITS)}, ${fy.toFixed(DIGITS)}: queue to refocus here`
        : "click the image to set the focus point";
    ctx.save();
    ctx.font = "11px sans-serif";
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    const pad = 3;
    const tw = Math.min(ctx.measureText(text).width, r.w - 2 * pad);
    ctx.fillStyle = "rgba(0, 0, 0, 0.55)";
    ctx.fillRect(r.x, r.y, tw + 2 * pad, 15);
    ctx.fillStyle = stale ? COLOUR : "#ddd";
    ctx.fillText(text, r.x + pad, r.y + 2, r.w - 2 * pad);
    ctx.restore();
}

/** Wrap the frontend's preview widget of this node (once): record the picture's rect, add the
 * crosshair after it is drawn, and turn a click on the picture into a focus point. */
function hookPreviewWidget(node) {
    const widget = widgetNamed(node, PREVIEW_WIDGET);
    if (!widget || widget.genrefocusHooked) return;
    widget.genrefocusHooked = true;

    const draw = widget.drawWidget;
    if (typeof draw === "function") {
        widget.drawWidget = function (ctx, options) {
            node.genrefocusImageRect = null;
            const target = shownImage(node);
            const ownDrawImage = Object.prototype.hasOwnProperty.call(ctx, "drawImage");
            const drawImage = ctx.drawImage;
            ctx.drawImage = function (img, ...args) {
                if (target && img === target && args.length === 4) {
                    const [x, y, w, h] = args;
                    node.genrefocusImageRect = { x, y, w, h };
                }
                return drawImage.call(this, img, ...args);
            };
            try {
                return draw.call(this, ctx, options);
            } finally {
                if (ownDrawImage) ctx.drawImage = drawImage;
                else delete ctx.drawImage;
                drawOverlay(node, ctx);
            }
        };
    }

    const pointerDown = widget.onPointerDown;
    widget.onPointerDown = function (pointer, n, canvas) {
        const handled = typeof pointerDown === "function" ? pointerDown.call(this, pointer, n, canvas) : false;
        const down = pointer?.eDown;
        if (!down || down.button > 0 || onBatchButton(node, down.canvasX, down.canvasY)) return handled;
        const at = pointOnImage(node, down.canvasX, down.canvasY);
        if (!at) return handled;
        // A click (no drag) focuses; a drag keeps the frontend's behaviour (move the node).
        pointer.onClick = (up) => {
            const p = (up && pointOnImage(node, up.canvasX, up.canvasY)) || at;
            setFocus(node, p[0], p[1], up ?? down);
        };
        return true;
    };
}

/** Hint drawn under the widgets while the node has no picture yet. */
function drawHint(node, ctx) {
    if (node.flags?.collapsed || node.imgs?.length) return;
    let top = 0;
    for (const w of node.widgets ?? []) {
        if (w.name === PREVIEW_WIDGET) continue;
        const y = w.last_y ?? w.y ?? 0;
        top = Math.max(top, y + (w.computedHeight ?? globalThis.LiteGraph?.NODE_WIDGET_HEIGHT ?? 20));
    }
    const linked = node.inputs?.find((i) => i.name === "image")?.link != null;
    const lines = linked
        ? ["Click to focus: " + HINT_NO_IMAGE + ",", "then click on it to set x, y."]
        : ["Click to focus: wire the photo into 'image',", HINT_NO_IMAGE + ", then click on it."];
    const lineHeight = 14;
    if (top + 8 + lines.length * lineHeight > node.size[1]) return; // no room: the node is too small
    ctx.save();
    ctx.font = "11px sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    ctx.fillStyle = "#999";
    lines.forEach((line, i) => ctx.fillText(line, node.size[0] / 2, top + 8 + i * lineHeight, node.size[0] - 12));
    ctx.restore();
}

app.registerExtension({
    name: "GenRefocus.ClickToFocus",

    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name !== NODE_TYPE) return;
        const proto = nodeType.prototype;

        const onNodeCreated = proto.onNodeCreated;
        proto.onNodeCreated = function () {
            const r = onNodeCreated?.apply(this, arguments);
            // Room for the hint (and later the picture) on a node added from the menu; loading a
            // workflow sets the saved size afterwards.
            this.setSize?.([Math.max(this.size[0], 300), Math.max(this.size[1], 140)]);
            return r;
        };

        const onExecuted = proto.onExecuted;
        proto.onExecuted = function (output) {
            const r = onExecuted?.apply(this, arguments);
            const p = output?.genrefocus_point;
            this.genrefocusLastPoint = Array.isArray(p) && p.length >= 2 ? [Number(p[0]), Number(p[1])] : null;
            return r;
        };

        // Runs before the widgets are drawn: hook the preview widget as soon as the frontend adds it.
        const onDrawForeground = proto.onDrawForeground;
        proto.onDrawForeground = function (ctx) {
            const r = onDrawForeground?.apply(this, arguments);
            hookPreviewWidget(this);
            drawHint(this, ctx);
            return r;
        };
    },
});
