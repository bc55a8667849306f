// Browser-compatibility rewrites of the WebGPU backend's WGSL, applied in the worker before
// the engine creates its shader modules.
//
// Chromium's WGSL compiler (Tint) evaluates `bitcast<f32>(0xff800000u)` as a
// const-expression and rejects it ("value -inf cannot be represented as 'f32'"); naga,
// which validates the shaders in `cargo test`, accepts it. `shaders/sample.wgsl` now builds
// its -inf from a function-scope `var` itself, so this rule no longer fires; it stays as the
// place for such rewrites. Each rule is a no-op once the shader no longer contains its
// pattern; `rewrites()` reports which rules fired. (Differences in what Tint *computes*, as
// opposed to what it rejects, are caught by `WebEngine.selfTest()` and fixed in the shaders.)

const RULES = [
  {
    name: 'sample.wgsl neg_inf(): runtime -inf',
    find: 'return bitcast<f32>(0xff800000u);',
    replace: 'var neg_inf_bits = 0xff800000u;\n    return bitcast<f32>(neg_inf_bits);',
  },
];

const fired = new Set();

export function installShaderCompat() {
  if (typeof GPUDevice === 'undefined' || GPUDevice.prototype.createShaderModule.specrejCompat) return;
  const original = GPUDevice.prototype.createShaderModule;
  const patched = function createShaderModule(descriptor) {
    if (descriptor && typeof descriptor.code === 'string') {
      let code = descriptor.code;
      for (const rule of RULES) {
        if (code.includes(rule.find)) {
          code = code.replaceAll(rule.find, rule.replace);
          fired.add(rule.name);
        }
      }
      if (code !== descriptor.code) descriptor = { ...descriptor, code };
    }
    return original.call(this, descriptor);
  };
  patched.specrejCompat = true;
  GPUDevice.prototype.createShaderModule = patched;
}

export function rewrites() {
  return [...fired];
}
