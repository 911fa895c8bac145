package upstream

// Cloud holds the endpoints of one of Microsoft's clouds.
type Cloud struct {
	TokenURL     string // with "{tenant}"
	GraphURL     string
	GraphScope   string
	OutlookScope string
	POP3Addr     string
	IMAPAddr     string
}

// Clouds are Microsoft's global and national clouds, by the name used in
// the configuration's `cloud` key.
var Clouds = map[string]Cloud{
	"global": {
		TokenURL: DefaultTokenURL, GraphURL: DefaultGraphURL, GraphScope: GraphScope,
		OutlookScope: OutlookScope, POP3Addr: DefaultPOP3Addr, IMAPAddr: DefaultIMAPAddr,
	},
	"usgov": { // GCC High
		TokenURL: "https://login.microsoftonline.us/{tenant}/oauth2/v2.0/token", GraphURL: "https://graph.microsoft.us/v1.0",
		GraphScope: "https://graph.microsoft.us/.default", OutlookScope: "https://outlook.office365.us/.default",
		POP3Addr: "outlook.office365.us:995", IMAPAddr: "outlook.office365.us:993",
	},
	"usgovdod": {
		TokenURL: "https://login.microsoftonline.us/{tenant}/oauth2/v2.0/token", GraphURL: "https://dod-graph.microsoft.us/v1.0",
		GraphScope: "https://dod-graph.microsoft.us/.default", OutlookScope: "https://outlook-dod.office365.us/.default",
		POP3Addr: "outlook-dod.office365.us:995", IMAPAddr: "outlook-dod.office365.us:993",
	},
	"china": { // operated by 21Vianet
		TokenURL: "https://login.chinacloudapi.cn/{tenant}/oauth2/v2.0/token", GraphURL: "https://microsoftgraph.chinacloudapi.cn/v1.0",
		GraphScope: "https://microsoftgraph.chinacloudapi.cn/.default", OutlookScope: "https://partner.outlook.cn/.default",
		POP3Addr: "partner.outlook.cn:995", IMAPAddr: "partner.outlook.cn:993",
	},
}
