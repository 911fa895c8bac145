package upstream

// ProxyBypass exposes Proxy.bypass to the tests.
func ProxyBypass(p *Proxy, host, port string) bool { return p.bypass(host, port) }
